"""What every layer may use: errors with exit statuses, crash points for tests, log lines.

Imports nothing of fedsync."""
