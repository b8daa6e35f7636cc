# syntax=docker/dockerfile:1
# Prometheus from Debian's package, for machines without a registry (deploy/smoke.sh):
#   podman build -f deploy/local-images/prometheus.Dockerfile --build-arg BASE_IMAGE=localhost/vitmerge-base:bookworm \
#     -t localhost/vitmerge-prometheus:bookworm deploy/local-images
# then PROMETHEUS_IMAGE=localhost/vitmerge-prometheus:bookworm for deploy/docker-compose.yml. Reads
# /etc/prometheus/prometheus.yml like the official prom/prometheus image.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /prometheus \
 && chown prometheus:prometheus /prometheus
USER prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus", "--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
