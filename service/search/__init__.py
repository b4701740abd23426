"""Search strategies: generators of model calls, run by ``service.search.runner``."""

from service.search.beam_prm import beam_prm
from service.search.saffron import saffron
from service.search.sampling import best_of_n, unguarded

STRATEGY_FNS = {"none": unguarded, "best_of_n": best_of_n, "beam_prm": beam_prm, "saffron": saffron}
