"""Meta-reinforcement-learning environments and tools (MAML section 5.3)."""
