"""costproxy: a metered gateway for LLM provider APIs (see the README's code map)."""
