"""Turning a ScanResult into things people read: terminal tables and figures."""
