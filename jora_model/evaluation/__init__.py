"""Generation-based evaluation on a golden set: SQuAD-style answer metrics (metrics), batched greedy
generation with the KV cache (greedy), the response's teacher-forced loss (scoring), the golden set read
from Alpaca records or tokenized shards (golden), and the report (report); run ties them together."""
