"""raftmail.node."""
