# herald-functions: the static binary, and the build machine's CA bundle for TLS to NATS (and to the
# relay's HTTPS endpoint). Built by scripts/images from a context it stages (target/images/functions).
FROM scratch
ARG VERSION
LABEL org.opencontainers.image.title="herald-functions" org.opencontainers.image.version="${VERSION}"
COPY herald-functions /herald-functions
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
# The default (127.0.0.1:9090) is unreachable from outside a container.
ENV HERALD_METRICS_LISTEN=0.0.0.0:9090
USER 65534:65534
EXPOSE 9090
ENTRYPOINT ["/herald-functions"]
