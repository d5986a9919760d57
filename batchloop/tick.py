async def tick(*a, **k): raise NotImplementedError
