"""raftmail.consensus."""
