# syntax=docker/dockerfile:1
# Multi-stage build of a static binary on a distroless/static base. The
# allocator, mimalloc, is C compiled by the mimalloc crate with the image's gcc.
#
# Static linking: crt-static against glibc (scripts/build-static.sh, the same
# script the e2e suite builds with, so tests run the binary the image ships).
# musl would need a target the test machines cannot install; the binary needs
# no NSS lookups (in-cluster config uses the API server's IP), so static glibc
# is safe here.
ARG RUST_VERSION=1.95
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY scripts/build-static.sh ./scripts/build-static.sh
RUN scripts/build-static.sh

FROM gcr.io/distroless/static-debian12:nonroot
ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="velero-vm-restore-webhook" \
      org.opencontainers.image.description="Mutating admission webhook that cleans VM Operator objects restored by Velero and orders groups before VMs" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /src/target/x86_64-unknown-linux-gnu/release/velero-vm-restore-webhook /velero-vm-restore-webhook
COPY LICENSE /licenses/LICENSE
USER 65532:65532
EXPOSE 8443 9090
ENTRYPOINT ["/velero-vm-restore-webhook"]
CMD ["serve"]
