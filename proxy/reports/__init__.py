"""Reports from Postgres: business figures, reporting periods, usage queries and the
gauges that export this month's figures. Read-only; the admin API and the subscriber
routes serve them over HTTP."""
