# The README's commands. Everything installs and starts what it needs.
## make demo: PostgreSQL + Kafka up, relay + load generator running, topics read back and verified.
.PHONY: demo test env-up env-down build release fuzz

demo:
	tests/demo

## make test: start PostgreSQL + Kafka, run fmt, clippy and every test, stop them again.
test:
	tests/run

## make env-up / env-down: the local PostgreSQL (127.0.0.1:54329) and Kafka (127.0.0.1:19092).
env-up:
	tests/env/up

env-down:
	tests/env/down

build:
	cargo build

release:
	cargo build --release

## make fuzz: seed from the golden fixtures and run every fuzz target briefly.
fuzz:
	fuzz/run-all
