"""End-to-end tests in a real headless Chromium (the Debian ``chromium`` package).

Playwright's Python package drives the browser installed at ``/usr/bin/chromium``
(``executable_path``); no browser is ever downloaded. CI installs it (``.ci/run``); on a
machine without it the tests are skipped with the reason.
"""
