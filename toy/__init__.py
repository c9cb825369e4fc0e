"""The toy world: a tiny Qwen3 with a character tokenizer, synthetic tasks and toy judges.

Every script in this repo runs with no arguments on this world, on a 2-core CPU, in minutes, and
shows its metric move.

- `toy.model`: one token per character (printable ASCII and newline) plus Qwen3's five special
  tokens, as a `PreTrainedTokenizerFast` carrying Qwen3's own chat template (`CHAT_TEMPLATE`) and a
  training variant (`TRAINING_CHAT_TEMPLATE`) that keeps `<think>...</think>` on every assistant
  turn and marks assistant output for assistant-only losses; the Qwen3 configs (`tiny_config`,
  `student_config`: GQA, qk-norm, tied embeddings, vocabulary padded to 128 rows); the shipped
  checkpoints. Token ids::

      0 <|endoftext|> (pad)   1 <|im_start|>   2 <|im_end|> (eos)   3 <think>   4 </think>
      5 "\\n"   6..100 the printable ASCII characters " " (32) .. "~" (126), in code-point order

- `toy.tasks`: seeded generators with disjoint train and test splits: `arithmetic` (word problems
  with a digit-by-digit scratchpad, GSM8K / MATH / multiple-choice styles, levels 1..5),
  `documents` (story, news, code grammars with checkable facts), `continuations` (prefix / true
  continuation pairs), `instructions` (answers a program computes).
- `toy.datasets`: the worlds as the training scripts read them (`sft_rows` for `sft_think.py
  --data toy...`, `distillation_rows` for `gkd.py`): train rows, held-out rows, graded problems.
- `toy.judges`: `AnswerJudge.score` grades an instruction's or a word problem's final answer;
  `ContinuationJudge.prefer`
  says which of two continuations of a document prefix is consistent with it.

Arithmetic answers are graded by `rewards.correct`, as in every training script.

The toy base model (`base_model_dir()`, shipped in `toy/base/`) was pretrained on the documents,
plain arithmetic (word problems answered at once with their equation, bare equations, digit tables
and column drills) and a share of chat-formatted questions answered without thinking. It continues
text, knows the chat format, has never seen a `<think>` block, is weak at multi-digit word problems,
and has much to gain from thinking SFT and from RL. `student_model_dir()` is a smaller model
pretrained the same way, for distillation; `sft_adapter_dir()` is the base's thinking-SFT adapter;
`domain_adapter_dirs()` are its story, news and code adapters (`toy/<domain>`: language-model SFT on
one domain's documents), the inputs of `karcher_merge.py`.

Commands::

    # rebuild toy/base (deterministic; minutes on 2 cores)
    python scripts/pretrain_toy.py
    # rebuild toy/student
    python scripts/pretrain_toy.py --student
    # the base's perplexity per domain and accuracy table
    python scripts/pretrain_toy.py --eval
    # every task as JSONL in the repo's data schemas
    python -m toy export --out data/
    # print one example of every task
    python -m toy show
"""

from toy.datasets import SFT_WORLDS, distillation_rows, sft_rows, text_only
from toy.judges import (
    AnswerJudge,
    ContinuationJudge,
    check_document,
    detect_domain,
    facts_thought,
    parse_arithmetic,
    parse_instruction,
    prompt_text,
    thinking_continuations,
)
from toy.model import (
    BASE_DIR,
    CHAT_TEMPLATE,
    DOMAIN_ADAPTERS,
    END_THINK_ID,
    IM_END_ID,
    IM_START_ID,
    MODEL_VOCAB_SIZE,
    PAD_ID,
    SFT_ADAPTER_DIR,
    SFT_FORMATS_DIR,
    SFT_INSTRUCT_DIR,
    SPECIAL_TOKENS,
    STUDENT_DIR,
    THINK_ID,
    TOY_DIR,
    TRAINING_CHAT_TEMPLATE,
    VOCAB,
    base_model_dir,
    domain_adapter_dirs,
    load_model,
    load_tokenizer,
    sft_adapter_dir,
    student_config,
    student_model_dir,
    tiny_config,
)
from toy.tasks import (
    DIFFICULTIES,
    DOMAINS,
    SPLITS,
    STYLES,
    arithmetic,
    continuations,
    documents,
    export,
    instructions,
    parse_levels,
    scratchpad,
)

__all__ = [
    "SFT_WORLDS",
    "distillation_rows",
    "sft_rows",
    "text_only",
    "AnswerJudge",
    "ContinuationJudge",
    "check_document",
    "detect_domain",
    "facts_thought",
    "parse_instruction",
    "prompt_text",
    "parse_arithmetic",
    "thinking_continuations",
    "BASE_DIR",
    "CHAT_TEMPLATE",
    "DOMAIN_ADAPTERS",
    "END_THINK_ID",
    "IM_END_ID",
    "IM_START_ID",
    "MODEL_VOCAB_SIZE",
    "PAD_ID",
    "SFT_ADAPTER_DIR",
    "SFT_FORMATS_DIR",
    "SFT_INSTRUCT_DIR",
    "SPECIAL_TOKENS",
    "STUDENT_DIR",
    "THINK_ID",
    "TOY_DIR",
    "TRAINING_CHAT_TEMPLATE",
    "VOCAB",
    "base_model_dir",
    "domain_adapter_dirs",
    "load_model",
    "load_tokenizer",
    "sft_adapter_dir",
    "student_config",
    "student_model_dir",
    "tiny_config",
    "DIFFICULTIES",
    "DOMAINS",
    "SPLITS",
    "STYLES",
    "arithmetic",
    "continuations",
    "documents",
    "export",
    "instructions",
    "parse_levels",
    "scratchpad",
]
