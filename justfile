# Recipes shared by people and CI. `just` is optional: each recipe is one
# plain cargo command you can also type yourself.

default: test

build:
    cargo build --workspace

test:
    cargo test --workspace

fmt:
    cargo fmt --all

demo:
    cargo run --release --bin rekey -- demo

lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

ci: lint test
