# meterflow pipeline image (used by docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY . /src
RUN pip install . \
 && rm -rf /src \
 && useradd --system --create-home --uid 10001 meterflow \
 && mkdir -p /etc/meterflow /var/lib/meterflow \
 && chown meterflow /var/lib/meterflow

USER meterflow
WORKDIR /var/lib/meterflow
CMD ["meter", "run", "--config", "/etc/meterflow/meterflow.toml"]
