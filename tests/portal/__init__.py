"""The subscriber portal's tests over HTTP (the browser story is tests/test_portal_browser.py)."""
