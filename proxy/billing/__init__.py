"""Stripe billing: checkout and plan changes (proxy side), webhook effects (listener side)."""
