"""fastllm.data: corpora, BERT MLM/NSP and GPT packed examples, a deterministic resumable sampler and loader."""
