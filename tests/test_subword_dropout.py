from lightning_transformer.data.subword_dropout import ResegmentedRows


class Rows:
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, indices):
        return {column: [self.rows[i][column] for i in indices] for column in ("ids", "index")}


class Text:
    def __init__(self, lines):
        self.lines = lines

    def __getitem__(self, indices):
        return {"text": [self.lines[i] for i in indices]}


def test_rows_get_fresh_ids_and_keep_cached_ones_where_the_new_ones_do_not_fit():
    cached = Rows([{"ids": [5], "index": 10}, {"ids": [6], "index": 11}, {"ids": [7], "index": 12}])
    text = {i: f"line {i}" for i in range(10, 13)}
    calls = []

    def encode(batch, indices):
        calls.append((batch, indices))
        fits = [i for i in indices if i != 11]  # row 11 came out longer than max_length
        return {"ids": [[100 + i] for i in fits], "index": fits}

    rows = ResegmentedRows(cached, Text(text), encode, ["ids"])
    assert len(rows) == 3
    assert rows[[2, 0, 1]] == {"ids": [[112], [110], [6]], "index": [12, 10, 11]}
    assert calls == [({"text": ["line 12", "line 10", "line 11"]}, [12, 10, 11])]
