# herald-nginx: Debian's nginx with the shared libraries it links (copied from the build machine by
# scripts/images, at the paths ldd gave), a main configuration for a container, and the sample
# deploy/nginx/herald.conf in conf.d/ (deploy/compose.yaml mounts the file instead, so edits apply
# without a rebuild).
FROM scratch
ARG VERSION
ARG NGINX_VERSION
LABEL org.opencontainers.image.title="herald-nginx" org.opencontainers.image.version="${VERSION}" \
      org.nginx.version="${NGINX_VERSION}"
COPY rootfs/ /
EXPOSE 80
STOPSIGNAL SIGQUIT
ENTRYPOINT ["/usr/sbin/nginx", "-c", "/etc/nginx/nginx.conf"]
