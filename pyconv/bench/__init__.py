"""Side-by-side correctness and speed report of pyconv against PyTorch: python -m pyconv.bench."""
