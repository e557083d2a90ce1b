"""Synthetic tasks with checkable answers, written as the same JSONL prompt files a user would bring."""
