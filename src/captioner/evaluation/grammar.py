"""Is a caption a sentence? Debian's link-grammar parser says (word salad does not parse).

A metric that counts keywords scores "a a is is sitting on a fallen in the blue" like a
caption; a full parse (no word left unlinked) tells it from a sentence. link-grammar is not on
PyPI: ``apt-get install python3-link-grammar link-grammar-dictionaries-en`` installs the system
Python's module, which a venv of the same Python version can import from dist-packages. Without
it the check is unavailable (None), never guessed.
"""

from __future__ import annotations

import atexit
import sys
from collections.abc import Callable
from functools import cache, lru_cache

DEBIAN_DIST_PACKAGES = "/usr/lib/python3/dist-packages"


@cache
def sentence_parser() -> Callable[[str], bool] | None:
    """caption -> whether link-grammar finds a full linkage (English dictionary), or None when
    link-grammar is not installed."""
    try:
        import linkgrammar  # noqa: F401
    except ImportError:
        if DEBIAN_DIST_PACKAGES not in sys.path:
            sys.path.append(DEBIAN_DIST_PACKAGES)
        try:
            import linkgrammar  # noqa: F401
        except ImportError:
            return None
    from linkgrammar import Dictionary, ParseOptions, Sentence

    dictionary = Dictionary("en")
    options = ParseOptions(min_null_count=0, max_null_count=0, verbosity=0)

    @lru_cache(maxsize=1 << 16)  # a caption model repeats itself: most checks are lookups
    def parses(caption: str) -> bool:
        return bool(caption.strip()) and len(Sentence(caption, dictionary, options).parse()) > 0

    # free the dictionary while link-grammar's module is still loaded (its __del__ fails when
    # the interpreter has already torn the module down)
    atexit.register(sentence_parser.cache_clear)
    return parses


# closed-class words no finished caption ends with: link-grammar accepts the ellipsis of "a boy
# in a blue shirt is" (as in "... that is who he is"), a reader takes it for a cut-off sentence
DANGLING_ENDINGS = frozenset(
    "a an the is are was were be been being has have had and or but of in on at to with by "
    "from for into onto over under near through while his her its their".split()
)


@cache
def complete_sentence_check() -> Callable[[str], bool] | None:
    """caption -> whether it is a whole sentence: link-grammar parses it and it does not stop
    on a word that needs another after it. None when link-grammar is not installed."""
    parses = sentence_parser()
    if parses is None:
        return None

    def complete(caption: str) -> bool:
        words = caption.split()
        return bool(words) and words[-1] not in DANGLING_ENDINGS and parses(caption)

    # this closure holds the dictionary too: let it go first (atexit runs last-registered first)
    atexit.register(complete_sentence_check.cache_clear)
    return complete
