# Recipes shared by people and CI. `just` is optional: each recipe is one
# plain cargo command you can also type yourself.

default: test

build:
    cargo build --workspace

test:
    cargo test --workspace

fmt:
    cargo fmt --all

# Debian packages of rekeyd (with the rekey CLI) and rekey-agent into
# target/debian/ (needs `cargo install --locked cargo-deb`). PROFILE=dev
# packages the debug build the tests use.
deb PROFILE="release":
    scripts/build-debs.sh {{PROFILE}}

demo:
    cargo run --release --bin rekey -- demo

# The unit tests UNIT times, then the whole suite FULL times under a CPU hog
# on every core; stops at the first failure (logs in target/stress/).
stress-tests UNIT="50" FULL="5":
    scripts/stress-tests.sh {{UNIT}} {{FULL}}

lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

ci: lint test

# Deterministic simulation: N seeds (release), schedules/s and faults by kind.
simulate N="1000" FIRST="1000":
    scripts/simulate {{N}} {{FIRST}}
