"""Test suite for trio_counter_worker (a package so ``tests.support`` imports resolve)."""
