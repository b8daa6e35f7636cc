# syntax=docker/dockerfile:1
# The compose load balancer from Debian's nginx, for machines without a registry (deploy/smoke.sh):
#   podman build -f deploy/local-images/nginx.Dockerfile --build-arg BASE_IMAGE=localhost/vitmerge-base:bookworm \
#     -t localhost/vitmerge-nginx:bookworm deploy/local-images
# then NGINX_IMAGE=localhost/vitmerge-nginx:bookworm for deploy/docker-compose.yml. Same config path
# (/etc/nginx/nginx.conf) as the official nginx image the compose file uses by default.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx-light \
 && rm -rf /var/lib/apt/lists/* \
 && ln -sf /dev/stderr /var/log/nginx/error.log
EXPOSE 8080
STOPSIGNAL SIGQUIT
ENTRYPOINT ["nginx", "-g", "daemon off;"]
