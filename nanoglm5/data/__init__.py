"""The data room: everything the model is trained on, built offline (GLM-5 arXiv 2602.15763: pre-training
data pipelines, SFT data and verifiable RL tasks at toy scale). Imports flow down this list:

  tasks.py      tasks SFT and RL share: the math generator and answer checker, code-task templates,
                agent (tool-use) tasks, the sft/train/eval task split, heavy-tailed lognormal lengths
  corpus.py     pre-training documents: embedded sources (CPython docs, stdlib and header code, math),
                generated junk, planted duplicates, readers of .jsonl files and Hugging Face datasets
  filters.py    exact + MinHash near-dup dedup, knowledge-quality classifier, code language ID, math judge
  tokenizer.py  byte-level BPE and GLM's chat template with assistant loss masks
  shards.py     token shards on disk: written by data/prepare.py, read by pre-training
  sft.py        SFT conversations (math, knowledge Q&A, code, agent transcripts)

`python data/prepare.py` runs corpus → filters → tokenizer → shards; the RL environments
(nanoglm5/rl/envs.py) put rewards on the tasks.
"""
