"""BatchCache: rows added, grown, removed and compacted, checked against transformers'
DynamicCache. No model, no app."""

import re

import pytest
import torch
from transformers import DynamicCache, LlamaConfig

from tursi.engine.kvcache import BatchCache, PrefillCache

LAYERS, HEADS, DIM = 2, 2, 4


def prefill_cache(rows, width, dtype=torch.float32, layers=LAYERS):
    """A prefill cache whose entries say where they come from: keys[b, :, s, :] = 100 * b + s
    (values are the keys' negatives), plus 1000 * layer."""
    cache = DynamicCache()
    marks = (100 * torch.arange(rows)[:, None] + torch.arange(width)[None, :]).to(dtype)
    for layer in range(layers):
        keys = (marks + 1000 * layer)[:, None, :, None].expand(rows, HEADS, width, DIM)
        cache.update(keys.clone(), -keys.clone(), layer)
    return cache


def row_marks(cache, row, layer=0):
    """The marks of one row's used columns (one number per column)."""
    keys = cache.layers[layer].keys[row, :, : cache.lengths[row]]
    values = cache.layers[layer].values[row, :, : cache.lengths[row]]
    assert torch.equal(values, -keys)
    assert (keys == keys[:1, :, :1]).all(-1).all(0).all()  # same mark over heads and dim
    return keys[0, :, 0].tolist()


def step(cache, marks):
    """One decode step as a model runs it: every layer writes key `mark` (value -mark) at each
    row's own column. Returns the step's positions and mask."""
    positions, mask = cache.prepare_step(torch.device("cpu"))
    new = torch.tensor(marks, dtype=torch.float32)[:, None, None, None]
    new = new.expand(len(marks), HEADS, 1, DIM)
    for layer in cache.layers:
        keys, values = layer.update(new.clone(), -new.clone(), layer_idx=0)
        assert keys.shape == values.shape == (len(marks), HEADS, cache.window, DIM)
    cache.advance()
    return positions, mask


def capacity(cache):
    """(rows, columns) the buffers hold."""
    return tuple(cache.layers[0].keys.shape[::2])


def test_add_row_copies_the_unpadded_columns():
    source = prefill_cache(rows=3, width=6)
    cache = BatchCache(LAYERS, max_length=100, boolean_mask=True)
    assert cache.add_row(source, 1, torch.arange(2, 6)) == 0
    assert cache.add_row(source, 0, torch.arange(6)) == 1
    assert cache.lengths == [4, 6]
    assert row_marks(cache, 0) == [102, 103, 104, 105]
    assert row_marks(cache, 1) == [0, 1, 2, 3, 4, 5]
    assert row_marks(cache, 0, layer=1) == [1102, 1103, 1104, 1105]


def test_reserved_rows_join_without_regrowing_the_buffers():
    source = prefill_cache(rows=3, width=6)
    cache = BatchCache(LAYERS, max_length=100, boolean_mask=True)
    cache.add_row(source, 2, torch.arange(6))
    cache.reserve_rows(3, 6, source)
    assert capacity(cache) == (4, 101)  # the row there and three more; max_length + 1 columns
    buffer = cache.layers[0].keys
    for row in range(3):
        cache.add_row(source, row, torch.arange(6 - row))
    assert cache.layers[0].keys is buffer
    assert cache.lengths == [6, 6, 5, 4]
    assert row_marks(cache, 0) == [200, 201, 202, 203, 204, 205]
    assert row_marks(cache, 1) == [0, 1, 2, 3, 4, 5]
    assert row_marks(cache, 2) == [100, 101, 102, 103, 104]
    assert row_marks(cache, 3) == [200, 201, 202, 203]


def test_a_prompt_one_column_past_a_buffer_step_is_copied_whole():
    """A 257-column prompt (one past the 256-column step) needs a 512-column buffer."""
    source = prefill_cache(rows=1, width=257)
    cache = BatchCache(LAYERS, max_length=1000, boolean_mask=True)
    assert cache.add_row(source, 0, torch.arange(257)) == 0
    assert row_marks(cache, 0) == list(range(257))


def test_rows_stay_packed_when_a_middle_row_leaves():
    source = prefill_cache(rows=5, width=8)
    cache = BatchCache(LAYERS, max_length=100, boolean_mask=True)
    for row, length in enumerate([3, 8, 5, 2, 7]):  # buffers grow while rows are added
        cache.add_row(source, row, torch.arange(8 - length, 8))
    assert [row_marks(cache, row)[0] for row in range(5)] == [5, 100, 203, 306, 401]

    cache.remove_row(1)  # the last row (source row 4) moves into row 1
    assert cache.lengths == [3, 7, 5, 2]
    assert row_marks(cache, 1) == [401, 402, 403, 404, 405, 406, 407]
    assert row_marks(cache, 1, layer=1) == [1401, 1402, 1403, 1404, 1405, 1406, 1407]
    assert [row_marks(cache, row) for row in (0, 2, 3)] == [
        [5, 6, 7],
        [203, 204, 205, 206, 207],
        [306, 307],
    ]

    cache.remove_row(3)  # the last row leaves: nothing moves
    assert cache.lengths == [3, 7, 5]
    assert row_marks(cache, 2) == [203, 204, 205, 206, 207]

    for _ in range(3):
        assert cache.layers[0].keys is not None
        cache.remove_row(0)
    assert cache.size == 0
    assert all(layer.keys is None and layer.values is None for layer in cache.layers)


def test_a_step_writes_each_row_at_its_own_column():
    source = prefill_cache(rows=2, width=5)
    cache = BatchCache(LAYERS, max_length=100, boolean_mask=True)
    cache.add_row(source, 0, torch.arange(5))
    cache.add_row(source, 1, torch.arange(3, 5))

    positions, mask = step(cache, [50, 150])
    assert positions.tolist() == [[5], [2]]
    assert mask.shape == (2, 1, 1, 6)
    assert mask[:, 0, 0].tolist() == [[True] * 6, [True] * 3 + [False] * 3]

    assert cache.lengths == [6, 3]
    assert row_marks(cache, 0) == [0, 1, 2, 3, 4, 50]
    assert row_marks(cache, 1) == [103, 104, 150]


def wide_step(cache, marks):
    """A step of len(marks[0]) tokens per row (a verify pass): every layer writes key
    marks[r][j] (value its negative) for row r's token j. Does not advance the cache."""
    width = len(marks[0])
    positions, mask = cache.prepare_step(torch.device("cpu"), width)
    new = torch.tensor(marks, dtype=torch.float32)[:, None, :, None]
    new = new.expand(len(marks), HEADS, width, DIM)
    for layer in cache.layers:
        keys, values = layer.update(new.clone(), -new.clone(), layer_idx=0)
        assert keys.shape == values.shape == (len(marks), HEADS, cache.window, DIM)
    return positions, mask


def test_a_verify_step_writes_each_rows_tokens_at_its_own_columns():
    """Width 3 over rows of 5 and 2 tokens: token j of row r at column lengths[r] + j, seeing
    its row's columns up to its own; the rows then advance by the tokens they kept, and the
    next step overwrites the columns of the tokens they did not."""
    source = prefill_cache(rows=2, width=5)
    cache = BatchCache(LAYERS, max_length=100, boolean_mask=True)
    cache.add_row(source, 0, torch.arange(5))
    cache.add_row(source, 1, torch.arange(3, 5))

    positions, mask = wide_step(cache, [[50, 51, 52], [150, 151, 152]])
    assert positions.tolist() == [[5, 6, 7], [2, 3, 4]]
    assert cache.window == 8 and cache.get_seq_length() == 5  # as a left-padded DynamicCache
    assert mask.shape == (2, 1, 3, 8)
    assert mask[0, 0].tolist() == [[True] * (6 + j) + [False] * (2 - j) for j in range(3)]
    assert mask[1, 0].tolist() == [[True] * (3 + j) + [False] * (5 - j) for j in range(3)]

    cache.advance([2, 3])
    assert cache.lengths == [7, 5]
    assert row_marks(cache, 0) == [0, 1, 2, 3, 4, 50, 51]
    assert row_marks(cache, 1, layer=1) == [1103, 1104, 150, 151, 152]
    assert cache.layers[0].keys[0, 0, 7, 0] == 52  # not kept: masked, then overwritten

    positions, mask = step(cache, [60, 160])
    assert positions.tolist() == [[7], [5]]
    assert mask[0, 0, 0].tolist() == [True] * 8
    assert row_marks(cache, 0) == [0, 1, 2, 3, 4, 50, 51, 60]
    assert row_marks(cache, 1) == [103, 104, 150, 151, 152, 160]


def test_a_row_advances_by_no_more_than_the_step_wrote():
    source = prefill_cache(rows=2, width=5)
    cache = BatchCache(LAYERS, max_length=100, boolean_mask=True)
    cache.add_row(source, 0, torch.arange(5))
    cache.add_row(source, 1, torch.arange(3, 5))
    wide_step(cache, [[1, 2], [3, 4]])
    for counts in ([3, 0], [0, -1], [1]):  # the message names what a scheduler bug sent
        with pytest.raises(ValueError, match=re.escape(f"counts {counts} for 2 rows of 2 tokens")):
            cache.advance(counts)
    assert cache.lengths == [5, 2]
    cache.advance([0, 2])
    assert cache.lengths == [5, 4]


def test_a_step_past_the_context_is_refused():
    """The buffers stop at max_length + 1 columns: a step that would write past them raises
    instead of writing into the next head's columns."""
    source = prefill_cache(rows=1, width=8)
    cache = BatchCache(LAYERS, max_length=10, boolean_mask=True)
    cache.add_row(source, 0, torch.arange(8))
    wide_step(cache, [[1, 2, 3]])  # columns 8..10: the last one there is
    assert capacity(cache) == (1, 11)
    with pytest.raises(ValueError):
        wide_step(cache, [[1, 2, 3, 4]])


@pytest.mark.parametrize("layers", [1, LAYERS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_additive_mask_for_eager_attention(dtype, layers):
    """In the cache's dtype, as transformers builds its own eager masks in the model's; a
    one-layer model has only layer 0 to read it from."""
    cache = BatchCache(layers, max_length=100, boolean_mask=False)
    source = prefill_cache(rows=2, width=3, dtype=dtype, layers=layers)
    cache.add_row(source, 0, torch.arange(3))
    cache.add_row(source, 1, torch.arange(2, 3))
    _, mask = cache.prepare_step(torch.device("cpu"))
    assert mask.dtype == dtype
    assert mask[0, 0, 0].tolist() == [0.0] * 4
    assert mask[1, 0, 0, :2].tolist() == [0.0, 0.0]
    assert (mask[1, 0, 0, 2:] == torch.finfo(dtype).min).all()
    _, mask = cache.prepare_step(torch.device("cpu"), 2)  # a verify pass: causal
    assert mask[0, 0, 0].tolist() == [0.0] * 4 + [torch.finfo(dtype).min]
    assert mask[0, 0, 1].tolist() == [0.0] * 5


@pytest.mark.parametrize("boolean_mask", [True, False], ids=["sdpa", "eager"])
def test_a_step_is_prepared_on_the_model_device(boolean_mask):
    """Positions, mask and write slots live on the device the step runs on (a GPU in
    production). The meta device stands in for it: a tensor made on the CPU by mistake
    meets a meta tensor and raises, or comes back on the wrong device."""
    source = prefill_cache(rows=2, width=4)
    cache = BatchCache(LAYERS, max_length=100, boolean_mask=boolean_mask)
    cache.add_row(source, 0, torch.arange(4))
    cache.add_row(source, 1, torch.arange(1, 4))
    meta = torch.device("meta")
    for width in (1, 3):
        positions, mask = cache.prepare_step(meta, width)
        assert positions.device == mask.device == cache.step_slots.device == meta
        assert positions.shape == (2, width)
        assert mask.shape == (2, 1, width, 4 + width)


def test_buffers_grow_by_doubling_and_are_reused_between_steps():
    """Rows double (1, 2, 4), columns grow in 256-column steps, and a step that fits the
    buffers writes into them in place instead of reallocating."""
    source = prefill_cache(rows=3, width=4)
    cache = BatchCache(LAYERS, max_length=1000, boolean_mask=True)
    capacities = []
    for row in range(3):
        cache.add_row(source, row, torch.arange(4))
        capacities.append(tuple(cache.layers[0].keys.shape[::2]))
    assert capacities == [(1, 256), (2, 256), (4, 256)]
    buffers = [layer.keys for layer in cache.layers]
    cache.prepare_step(torch.device("cpu"))
    cache.advance()
    cache.prepare_step(torch.device("cpu"))
    assert all(layer.keys is buffer for layer, buffer in zip(cache.layers, buffers, strict=True))


def test_columns_grow_only_when_a_row_needs_the_next_one():
    """A 255-token prompt and its first step's column fill a 256-column buffer exactly: that
    step writes in place. The next one needs column 257: the columns double (the rows stay),
    and a longer prompt doubles them again. Every move keeps the rows' contents."""
    source = prefill_cache(rows=3, width=600)
    cache = BatchCache(LAYERS, max_length=2000, boolean_mask=True)
    cache.add_row(source, 0, torch.arange(345, 600))
    cache.add_row(source, 1, torch.arange(345, 600))
    assert capacity(cache) == (2, 256)
    buffers = [layer.keys for layer in cache.layers]
    step(cache, [50, 150])
    assert all(layer.keys is buffer for layer, buffer in zip(cache.layers, buffers, strict=True))
    step(cache, [60, 160])
    assert capacity(cache) == (2, 512)
    cache.add_row(source, 2, torch.arange(600))
    assert capacity(cache) == (4, 1024)
    assert row_marks(cache, 0) == [*range(345, 600), 50, 60]
    assert row_marks(cache, 1, layer=1) == [*range(1445, 1700), 150, 160]
    assert row_marks(cache, 2) == list(range(200, 800))


def test_columns_stop_one_past_the_context():
    """Buffers never outgrow the context: with max_length 100 they hold 101 columns (a row of
    the whole context and its step's column), not a 256-column step, and a 99-token row still
    takes its step."""
    source = prefill_cache(rows=1, width=99)
    cache = BatchCache(LAYERS, max_length=100, boolean_mask=True)
    cache.add_row(source, 0, torch.arange(99))
    step(cache, [50])
    assert capacity(cache) == (1, 101)
    assert row_marks(cache, 0) == [*range(99), 50]


def test_size_questions_get_the_answers_of_transformers_own_cache():
    """transformers' CacheLayerMixin makes every cache layer answer get_seq_length,
    get_mask_sizes and get_max_length, and Cache.is_initialized reads the layers' flag. Llama's
    and GPT-2's forward ask none of them when given position ids and a 4-D mask, as the engine
    gives them, but other decoders' forward (OPT, Falcon, Bloom, MPT, XGLM, BioGPT, CTRL) asks
    get_seq_length every time. The answers are those of a DynamicCache: an empty one before
    any row, and while a step runs, one holding the batch left-padded to its longest row (as
    generate() would hold it)."""

    def sizes(cache):
        return cache.get_seq_length(), cache.get_mask_sizes(1, 0), cache.get_max_length()

    cache = BatchCache(LAYERS, max_length=100, boolean_mask=True)
    assert sizes(cache) == sizes(DynamicCache(config=LlamaConfig(num_hidden_layers=LAYERS)))
    padded = prefill_cache(rows=2, width=5)
    cache.add_row(padded, 0, torch.arange(5))
    cache.add_row(padded, 1, torch.arange(3, 5))
    cache.prepare_step(torch.device("cpu"))
    assert sizes(cache) == sizes(padded) == (5, (6, 0), -1)
    assert cache.is_initialized is padded.is_initialized is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prefill_cache_answers_size_questions_as_transformers_own_cache(dtype):
    """The same questions of a prefill group's cache, chunk by chunk: the answers of a
    DynamicCache holding the columns written so far (and the same keys and values, in the
    model's dtype)."""

    def sizes(cache):
        return cache.get_seq_length(), cache.get_mask_sizes(1, 0), cache.get_max_length()

    cache = PrefillCache(LAYERS, rows=2, width=8)
    reference = DynamicCache(config=LlamaConfig(num_hidden_layers=LAYERS))
    assert sizes(cache) == sizes(reference) == (0, (1, 0), -1)
    for columns in (3, 2):
        chunk = torch.randn(2, HEADS, columns, DIM).to(dtype)
        for index, layer in enumerate(cache.layers):
            keys, values = layer.update(chunk, -chunk)
            assert keys.dtype == values.dtype == dtype
            assert torch.equal(keys, reference.update(chunk, -chunk, index)[0])
            assert torch.equal(values, reference.layers[index].values)
        cache.advance(columns)
        assert sizes(cache) == sizes(reference)
    assert cache.is_initialized is reference.is_initialized is True


@pytest.mark.parametrize("layers", [1, 3])
def test_used_bytes_count_the_keys_and_values_of_the_rows_columns(layers):
    """What the rows' tokens take: per token and layer, one key and one value of HEADS x DIM
    numbers; the columns reserved past the rows' lengths are not counted."""
    cache = BatchCache(layers, max_length=100, boolean_mask=True)
    assert cache.used_bytes() == 0 == cache.reserved_bytes  # no buffers yet
    source = prefill_cache(rows=2, width=6, layers=layers)
    cache.add_row(source, 0, torch.arange(6))
    per_token = 2 * layers * HEADS * DIM * 4  # float32
    assert cache.used_bytes() == 6 * per_token < cache.reserved_bytes
    cache.add_row(source, 1, torch.arange(2, 6))
    step(cache, [7, 8])
    assert cache.used_bytes() == (7 + 5) * per_token


@pytest.mark.parametrize(("longest", "columns"), [(255, 256), (256, 512)])
def test_reserved_rows_have_room_for_their_next_token_and_no_more(longest, columns):
    """A prefill group of prompts up to `longest` tokens: the buffers take its rows with one
    column more (the first decode step's token), in whole 256-column steps, and that step
    then writes without regrowing them."""
    source = prefill_cache(rows=2, width=longest)
    cache = BatchCache(LAYERS, max_length=1000, boolean_mask=True)
    cache.reserve_rows(2, longest, source)
    assert capacity(cache) == (2, columns)
    buffer = cache.layers[0].keys
    cache.add_row(source, 0, torch.arange(longest))
    cache.add_row(source, 1, torch.arange(longest - 3))
    step(cache, [1, 2])
    assert cache.layers[0].keys is buffer
    assert cache.lengths == [longest + 1, longest - 2]
