"""Shared pytest setup: tests run in the package's test mode (small sizes), like `nbdev_test`."""
import os

os.environ.setdefault("IN_TEST", "1")
