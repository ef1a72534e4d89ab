"""The fedhft test suite: one folder per package, scenarios/ for end-to-end runs, support/ for shared helpers."""
