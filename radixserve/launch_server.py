"""`python -m radixserve.launch_server [flags]`: SGLang's spelling of `python -m radixserve` (the `radixserve`
console script is the same entry point)."""
from radixserve.__main__ import main

if __name__ == "__main__":
    main()
