# Thin entry points; the logic lives in scripts/.
.PHONY: setup build test lint demo bench clean help
.DEFAULT_GOAL := help

help:  ## list targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-7s %s\n", $$1, $$2}'

setup:  ## create .venv, install pinned dependencies, build src/ with colcon, write env.sh
	@bash scripts/setup.sh

build: setup  ## alias of setup (the build is part of it)

lint: setup  ## ruff over the whole repository
	@bash scripts/with_env.sh ruff check .

test: setup  ## setup (cached) + ruff + pytest over every package, ROS-isolated
	@bash scripts/test.sh

demo: setup  ## closed-loop demo through ROS in the MuJoCo simulation
	@bash scripts/demo.sh

bench: setup  ## benchmarks: JSON + markdown table in outputs/bench
	@bash scripts/with_env.sh iflybot bench --out outputs/bench

clean:  ## remove build products (keeps .venv)
	rm -rf build install log
