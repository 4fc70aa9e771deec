"""The attention worker's hot copy against a real KV-cache service: a bounded LRU cache of the service's
pages that pulls what it lacks, never evicts a pinned page, and refuses, changing nothing, what does not fit.
"""

from __future__ import annotations

import grpc
import pytest
import torch

from common.kvcache import BlockPool
from services.attention.hot_copy import HotCopy, HotCopyFull
from services.kvcache.client import RemoteBlockManager
from services.kvcache.service import KVCacheService, serve_kvcache

BS = 4


@pytest.fixture
def service(checkpoint_dir):
    """A KV-cache service of 16 blocks whose block b holds the value b + 1 everywhere; a client to it."""
    service = KVCacheService.from_model(
        checkpoint_dir("v2_lite"), block_size=BS, num_blocks=16, dtype="float32"
    )
    server, address = serve_kvcache(service)
    kv = RemoteBlockManager(address)
    layers, entry = service.pool.num_layers, service.pool.entry_dim
    kv.write_blocks(list(range(16)), torch.arange(1, 17.0)[None, :, None, None].expand(layers, 16, BS, entry))
    yield kv
    kv.close()
    server.stop(grace=None)


def hot_copy(kv: RemoteBlockManager, pages: int) -> HotCopy:
    return HotCopy(BlockPool(kv.num_layers, pages, BS, kv.entry_dim, kv.dtype), kv)


def content(hot: HotCopy, table: list[int]) -> list[float]:
    """The value each local page of `table` holds (every element of a page is the same)."""
    return [float(hot.pool.pages[0, page, 0, 0]) for page in table]


def test_pages_are_pulled_evicted_least_recently_used_and_pulled_back(service):
    hot = hot_copy(service, 4)
    [local] = hot.open([[0, 1, 2]], filled=[0, 1, 2], stale=[])
    assert content(hot, local) == [1.0, 2.0, 3.0] and hot.pulled == 3
    hot.close([[0, 1, 2]])
    [local] = hot.open([[2, 3, 4]], filled=[2, 3], stale=[])  # 4: new tokens only, nothing to pull
    assert content(hot, local)[:2] == [3.0, 4.0] and (hot.pulled, hot.evicted) == (4, 1)  # 2 stays resident
    hot.close([[2, 3, 4]])
    [local] = hot.open([[0]], filled=[0], stale=[])  # 0 was evicted first (least recently used)
    assert content(hot, local) == [1.0] and (hot.pulled, hot.evicted) == (5, 2)
    hot.close([[0]])


def test_a_stale_page_is_pulled_again(service):
    hot = hot_copy(service, 4)
    [local] = hot.open([[5]], filled=[5], stale=[])
    hot.pool.pages[:, local[0]] = -1.0  # as if its local copy had fallen behind
    hot.close([[5]])
    [again] = hot.open([[5]], filled=[5], stale=[])
    assert again == local and content(hot, again) == [-1.0]  # resident and up to date: not pulled
    hot.close([[5]])
    [again] = hot.open([[5]], filled=[5], stale=[5])
    assert content(hot, again) == [6.0] and hot.pulled == 2
    hot.close([[5]])


def test_pinned_pages_are_never_evicted_and_a_batch_that_does_not_fit_changes_nothing(service):
    hot = hot_copy(service, 4)
    first = hot.open([[6, 7]], filled=[6, 7], stale=[])  # open: pinned
    before = (hot.resident, hot.pulled, hot.evicted)
    with pytest.raises(HotCopyFull, match="needs 3 blocks"):
        hot.open([[8, 9, 10]], filled=[8, 9, 10], stale=[])
    assert (hot.resident, hot.pulled, hot.evicted) == before
    [local] = hot.open([[8, 9]], filled=[8, 9], stale=[])  # fits beside the pinned pages
    assert content(hot, first[0]) == [7.0, 8.0] and content(hot, local) == [9.0, 10.0]
    hot.close([[6, 7]])
    hot.close([[8, 9]])
    [local] = hot.open([[10, 11, 12, 13]], filled=[10, 11, 12, 13], stale=[])  # every page free to evict
    assert content(hot, local) == [11.0, 12.0, 13.0, 14.0]


def test_local_slots_map_to_the_service_slots(service):
    hot = hot_copy(service, 4)
    [local] = hot.open([[9, 3]], filled=[], stale=[])
    slots = torch.tensor([local[0] * BS + 1, local[1] * BS + 3])
    assert hot.service_slots(slots).tolist() == [9 * BS + 1, 3 * BS + 3]


def test_a_pull_that_fails_changes_nothing(checkpoint_dir):
    service = KVCacheService.from_model(
        checkpoint_dir("v2_lite"), block_size=BS, num_blocks=16, dtype="float32"
    )
    server, address = serve_kvcache(service)
    kv = RemoteBlockManager(address, timeout=5)
    hot = hot_copy(kv, 4)
    server.stop(grace=None).wait()
    with pytest.raises(grpc.RpcError):
        hot.open([[1, 2]], filled=[1, 2], stale=[])
    assert (hot.resident, hot.pulled) == (0, 0)
    [local] = hot.open([[3]], filled=[], stale=[])  # nothing to pull: no call to the service
    assert hot.resident == 1 and local == [0]
    kv.close()
