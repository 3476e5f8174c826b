"""Reconciliation of our records with the providers' and Stripe's own reports."""
