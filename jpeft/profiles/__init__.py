"""Architecture profiles: where each model family keeps the sites that PEFT methods act on."""

from jpeft.profiles._families import ALL as ALL
from jpeft.profiles._families import BART as BART
from jpeft.profiles._families import BERT as BERT
from jpeft.profiles._families import GPT2 as GPT2
from jpeft.profiles._families import LLAMA as LLAMA
from jpeft.profiles._families import ROBERTA as ROBERTA
from jpeft.profiles._families import TUNIX as TUNIX
from jpeft.profiles._families import TUNIX_GEMMA3 as TUNIX_GEMMA3
from jpeft.profiles._families import detect as detect
from jpeft.profiles._families import matching as matching
from jpeft.profiles._families import tied_embeddings as tied_embeddings
from jpeft.profiles._profile import Profile as Profile
from jpeft.profiles._profile import ProfileError as ProfileError
from jpeft.profiles._profile import TiedHead as TiedHead
from jpeft.profiles._profile import check as check

__all__ = [
    "ALL",
    "BART",
    "BERT",
    "GPT2",
    "LLAMA",
    "ROBERTA",
    "TUNIX",
    "TUNIX_GEMMA3",
    "Profile",
    "ProfileError",
    "TiedHead",
    "check",
    "detect",
    "matching",
    "tied_embeddings",
]
