"""raftmail.cli."""
