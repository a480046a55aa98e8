"""Keys built in one place: a customer's state key is ``tenant|customer``.

Tenant ids never contain the separator (the configuration refuses one that does), so splitting at the
first separator gives both ids back whatever the customer id holds.
"""

from __future__ import annotations

from typing import Tuple

KEY_SEP = "|"


def customer_key(tenant_id: str, customer_id: str) -> str:
    """The state key of one customer.

    >>> customer_key("acme", "cust_456")
    'acme|cust_456'
    """
    return tenant_id + KEY_SEP + customer_id


def split_key(key: str) -> Tuple[str, str]:
    """``(tenant_id, customer_id)`` of a :func:`customer_key`.

    >>> split_key("acme|cust|456")
    ('acme', 'cust|456')
    """
    tenant_id, _, customer_id = key.partition(KEY_SEP)
    return tenant_id, customer_id
