# Itera-Lite HTTP server: `docker compose up` serves the shipped model on port 8000.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p itera-cli && strip target/release/itera

FROM debian:bookworm-slim
COPY --from=build /src/target/release/itera /usr/local/bin/itera
COPY models/itera-lite-tiny /models/itera-lite-tiny
EXPOSE 8000
# Inside the container the server must listen on all interfaces; publish the port explicitly.
CMD ["itera", "serve", "--model", "/models/itera-lite-tiny", "--host", "0.0.0.0", "--port", "8000"]
