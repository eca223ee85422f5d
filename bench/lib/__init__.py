"""Building blocks of the raftmail benchmark harness (bench/run.py). Everything here talks to 127.0.0.1 only."""
