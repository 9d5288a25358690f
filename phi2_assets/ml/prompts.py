"""Prompt templates. Each holds `{article}` and ends where the summary begins."""

from __future__ import annotations

SEED_TEMPLATE = "seed"
TEMPLATES: dict[str, str] = {
    # The seed notebooks' prompt; the summary (then EOS) follows "Summary: ".
    SEED_TEMPLATE: "Article: {article}\n\nSummarize the above article in one sentence.\nSummary: ",
    "tldr": "{article}\n\nTL;DR: ",
    "headline": (
        "Read the news article and write a one-sentence summary.\n\nArticle: {article}\n\nOne-sentence summary: "
    ),
    "bbc": "BBC News article:\n{article}\n\nIn one sentence: ",
}


def template_text(name: str) -> str:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown prompt template {name!r}; known: {', '.join(sorted(TEMPLATES))}") from None


def split_template(name: str) -> tuple[str, str]:
    """The text before and after `{article}`, tokenized apart so the article alone can be truncated."""
    before, after = template_text(name).split("{article}")
    return before, after


def format_prompt(name: str, article: str) -> str:
    return template_text(name).format(article=article)

