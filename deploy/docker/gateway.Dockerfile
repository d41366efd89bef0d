# herald-gateway: the static binary, and the build machine's CA bundle for TLS to NATS. Built by
# scripts/images from a context it stages (target/images/gateway); see README.md here.
FROM scratch
ARG VERSION
LABEL org.opencontainers.image.title="herald-gateway" org.opencontainers.image.version="${VERSION}"
COPY herald-gateway /herald-gateway
# Where rustls-native-certs looks first on Debian; SSL_CERT_FILE points elsewhere.
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
# The default (127.0.0.1:8080) is unreachable from outside a container.
ENV HERALD_LISTEN=0.0.0.0:8080
# nobody: the gateway writes no files and binds no privileged port.
USER 65534:65534
EXPOSE 8080
ENTRYPOINT ["/herald-gateway"]
