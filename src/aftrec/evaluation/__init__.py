"""Full-ranking evaluation per domain."""
