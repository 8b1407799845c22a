"""Records and what is read from them: JSONL records, agreement statistics, reports and summaries.
"""
