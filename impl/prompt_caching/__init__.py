"""Project 10: prompt caching (prefix blocks shared across requests)."""
