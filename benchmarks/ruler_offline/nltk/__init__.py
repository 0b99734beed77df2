"""A stand-in for the one part of nltk that RULER's generators use (sent_tokenize, for
the essay haystack), put first on the generators' path by benchmarks/ruler.py: nltk's
own splitter needs its punkt model, which is downloaded at run time, and nothing here
may download. It only decides where needles go between sentences."""
