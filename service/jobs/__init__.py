"""The long work: plain job functions (`tasks.py`, PyTorch in the runner only), the queues that
run them (Celery on Redis, or the api's own processes) and the lease sweep."""
