"""What admins read: seat and machine reports, charts, and the table, CSV and JSON writers."""
