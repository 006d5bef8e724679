"""Benchmarks: quality (tasks x mechanisms) and speed/memory (mechanisms x lengths), results as JSON lines."""
