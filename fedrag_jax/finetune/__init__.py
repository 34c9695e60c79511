"""Fine-tuning: LSR for the retriever, RALT for the generator (RA-DIT / REPLUG)."""
