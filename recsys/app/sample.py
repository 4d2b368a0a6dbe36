"""The embedded default dataset: a small synthetic shop catalog and interaction log, made here.

The generator is deterministic (fixed seed, stdlib only) and the output is committed under
recsys/app/sample_data/, so `recsys demo` and the tests need no download. It has structure for the
models to learn: users prefer 1-3 categories and a brand in each, popularity is Zipf-skewed,
sessions move from a searched product to its alternatives and then to an accessory, and about a
third of the rows carry the search query that led to the item.

Regenerate with `python -m recsys.app.sample`.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import TypeVar

SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data"
CATALOG_FILE = "catalog.csv"
INTERACTIONS_FILE = "interactions.csv"
QUERIES_FILE = "queries.jsonl"

T = TypeVar("T")

# Event weights: what a view, an add-to-cart and a purchase count for as implicit feedback.
VIEW, CART, PURCHASE = 1, 3, 5
USERS = 200
START_EPOCH = 1_709_251_200  # 2024-03-01T00:00:00Z
WINDOW_SECONDS = 90 * 24 * 3600


@dataclass(frozen=True)
class ProductType:
    """A kind of product: its variants, the searches that find it, and what people buy with it."""

    name: str
    variants: tuple[str, ...]
    queries: tuple[str, ...]
    price: tuple[int, int]
    features: tuple[str, ...]
    accessories: tuple[str, ...] = ()


@dataclass(frozen=True)
class Category:
    name: str
    brands: tuple[str, ...]
    use: str
    types: tuple[ProductType, ...]
    popularity: float = 1.0


def _parts(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split("|") if p.strip())


def _t(
    name: str,
    variants: str,
    queries: str,
    price: tuple[int, int],
    features: str,
    accessories: str = "",
) -> ProductType:
    # "|"-separated strings keep the table below readable.
    return ProductType(
        name, _parts(variants), _parts(queries), price, _parts(features), _parts(accessories)
    )


CATEGORIES: tuple[Category, ...] = (
    Category(
        "Electronics > Audio",
        ("Sonora", "Aurelia", "Bassline", "Kestrel"),
        "Made for commutes, workouts and long flights.",
        (
            _t(
                "Headphones",
                "Wireless Noise-Cancelling|Over-Ear Studio|On-Ear Bluetooth|Kids Volume-Limited",
                "headphones|noise cancelling headphones|wireless headphones|bluetooth headphones",
                (39, 349),
                "active noise cancelling|a 30-hour battery|memory-foam ear cushions|a built-in microphone for calls",
                "Headphone Case|Headphone Stand",
            ),
            _t(
                "Earbuds",
                "True Wireless|Sport Ear-Hook|Noise-Cancelling",
                "earbuds|wireless earbuds|in-ear headphones",
                (29, 249),
                "a pocketable charging case|sweat resistance|touch controls|low-latency gaming mode",
                "Replacement Ear Tips",
            ),
            _t(
                "Bluetooth Speaker",
                "Portable Waterproof|Mini Clip-On|Party",
                "bluetooth speaker|portable speaker|waterproof speaker",
                (25, 299),
                "IP67 water resistance|360-degree sound|a 20-hour battery|stereo pairing",
            ),
            _t(
                "Soundbar",
                "Compact|Dolby Atmos",
                "soundbar|tv speaker",
                (129, 799),
                "HDMI eARC|a wireless subwoofer|clear dialogue mode",
            ),
            _t(
                "Headphone Case",
                "Hard-Shell Travel|Zip Fabric",
                "headphone case",
                (15, 35),
                "a crush-proof shell|a cable pocket|a carry strap",
            ),
            _t(
                "Headphone Stand",
                "Aluminium|Walnut Wood",
                "headphone stand",
                (19, 49),
                "a weighted base|a soft headband rest|cable management",
            ),
            _t(
                "Replacement Ear Tips",
                "Memory Foam|Silicone",
                "ear tips|replacement ear tips",
                (9, 25),
                "three sizes in the box|better noise isolation|a secure fit",
            ),
        ),
        popularity=1.6,
    ),
    Category(
        "Electronics > Phones & Accessories",
        ("Voltix", "Nimbus", "Halcyon"),
        "Keeps you connected and charged all day.",
        (
            _t(
                "Smartphone",
                "5G 128GB|Compact 64GB|Pro Max 256GB",
                "smartphone|5g phone|unlocked phone",
                (199, 1199),
                "a triple camera|a 120Hz OLED display|all-day battery|fast charging",
                "Phone Case|Screen Protector|USB-C Charger",
            ),
            _t(
                "Phone Case",
                "Clear Shockproof|Leather Wallet|Slim Silicone",
                "phone case|shockproof phone case",
                (9, 49),
                "raised camera edges|drop protection|a soft-touch finish",
            ),
            _t(
                "Screen Protector",
                "Tempered Glass|Privacy Glass",
                "screen protector",
                (7, 29),
                "9H hardness|bubble-free install|an alignment frame",
            ),
            _t(
                "USB-C Charger",
                "65W GaN|20W Fast",
                "usb c charger|fast charger|phone charger",
                (15, 59),
                "foldable prongs|power delivery|two ports",
            ),
            _t(
                "Power Bank",
                "10000mAh Slim|20000mAh High-Capacity",
                "power bank|portable charger",
                (19, 69),
                "USB-C power delivery|an LED charge display|airline-safe capacity",
            ),
            _t(
                "Wireless Charging Pad",
                "15W Qi|3-in-1 Stand",
                "wireless charger|charging pad",
                (19, 79),
                "Qi compatibility|overheat protection|a non-slip surface",
            ),
        ),
        popularity=1.3,
    ),
    Category(
        "Electronics > Computers",
        ("Axion", "Lumetra", "Quillon"),
        "Built for work, study and creative projects.",
        (
            _t(
                "Laptop",
                "14-inch Ultrabook|16-inch Creator|13-inch Student",
                "laptop|ultrabook|thin and light laptop",
                (499, 2299),
                "a backlit keyboard|a 2.8K display|16GB of memory|a 1TB SSD",
                "Laptop Sleeve|USB-C Hub|Wireless Mouse",
            ),
            _t(
                "Mechanical Keyboard",
                "Tenkeyless RGB|Low-Profile Wireless",
                "mechanical keyboard|wireless keyboard",
                (49, 199),
                "hot-swappable switches|per-key RGB lighting|a USB-C cable",
            ),
            _t(
                "Wireless Mouse",
                "Ergonomic Vertical|Silent Compact",
                "wireless mouse|ergonomic mouse",
                (19, 99),
                "silent clicks|a 70-day battery|multi-device switching",
            ),
            _t(
                "Monitor",
                "27-inch 4K|24-inch IPS|34-inch Ultrawide Curved",
                "monitor|4k monitor|ultrawide monitor",
                (149, 899),
                "USB-C power delivery|a height-adjustable stand|HDR support",
                "Monitor Arm",
            ),
            _t(
                "Laptop Sleeve",
                "Water-Resistant 14-inch|Felt 16-inch",
                "laptop sleeve|laptop case",
                (19, 59),
                "a padded lining|an accessory pocket|a water-resistant shell",
            ),
            _t(
                "USB-C Hub",
                "7-in-1|4-Port Travel",
                "usb c hub|docking station|usb hub",
                (25, 89),
                "4K HDMI output|an SD card reader|100W pass-through charging",
            ),
            _t(
                "Webcam",
                "1080p Streaming|4K Autofocus",
                "webcam|streaming camera",
                (39, 199),
                "a privacy shutter|dual microphones|automatic light correction",
            ),
            _t(
                "Monitor Arm",
                "Gas Spring|Dual Screen",
                "monitor arm|monitor mount",
                (39, 149),
                "a clamp and grommet mount|full tilt and swivel|cable routing",
            ),
        ),
        popularity=1.2,
    ),
    Category(
        "Home > Kitchen",
        ("Copperleaf", "Ironhearth", "Maison Verre"),
        "A dependable favourite for everyday home cooking.",
        (
            _t(
                "Espresso Machine",
                "Dual Boiler|Compact Pump",
                "espresso machine|coffee machine",
                (199, 1299),
                "a 15-bar pump|a steam wand|a PID temperature control",
                "Milk Frother|Coffee Grinder",
            ),
            _t(
                "Coffee Grinder",
                "Conical Burr|Manual Hand",
                "coffee grinder|burr grinder",
                (29, 249),
                "40 grind settings|a low-retention chute|stainless steel burrs",
            ),
            _t(
                "Milk Frother",
                "Electric|Handheld",
                "milk frother|frother",
                (12, 99),
                "hot and cold foam|a one-touch button|a dishwasher-safe jug",
            ),
            _t(
                "Chef's Knife",
                "8-inch Damascus Steel|6-inch Japanese Gyuto",
                "chef knife|kitchen knife|japanese knife",
                (39, 229),
                "a full-tang handle|a razor-sharp edge|a balanced weight",
                "Knife Sharpener|Cutting Board",
            ),
            _t(
                "Cast Iron Skillet",
                "10-inch Pre-Seasoned|12-inch Deep",
                "cast iron skillet|frying pan|cast iron pan",
                (25, 89),
                "even heat retention|oven-safe handles|a pre-seasoned surface",
            ),
            _t(
                "Blender",
                "High-Speed|Personal Smoothie",
                "blender|smoothie blender",
                (39, 449),
                "a 1500W motor|BPA-free jars|pulse control",
            ),
            _t(
                "Electric Kettle",
                "Gooseneck Pour-Over|Glass Rapid-Boil",
                "electric kettle|gooseneck kettle",
                (25, 149),
                "variable temperature|auto shut-off|a keep-warm mode",
            ),
            _t(
                "Cutting Board",
                "End-Grain Walnut|Bamboo",
                "cutting board|chopping board",
                (19, 119),
                "juice grooves|non-slip feet|a knife-friendly surface",
            ),
            _t(
                "Knife Sharpener",
                "Whetstone|Pull-Through",
                "knife sharpener|whetstone",
                (12, 59),
                "a 1000/6000 grit stone|an angle guide|a non-slip base",
            ),
        ),
        popularity=1.4,
    ),
    Category(
        "Sports > Running Shoes",
        ("Stridewell", "Vantage", "Fleetfoot"),
        "Tested over thousands of miles by real runners.",
        (
            _t(
                "Road Running Shoes",
                "Cushioned|Lightweight|Stability",
                "running shoes|road running shoes|cushioned running shoes",
                (79, 189),
                "a responsive foam midsole|a breathable mesh upper|a durable rubber outsole",
                "Running Socks|Running Belt",
            ),
            _t(
                "Trail Running Shoes",
                "Waterproof|Grip",
                "trail running shoes|trail shoes",
                (89, 199),
                "deep lugs for mud|a rock plate|a gusseted tongue",
                "Running Socks|Hydration Vest",
            ),
            _t(
                "Racing Flats",
                "Carbon Plate|Featherweight",
                "racing shoes|carbon plate shoes|marathon shoes",
                (129, 259),
                "a full-length carbon plate|a 7mm drop|a featherweight upper",
                "Running Socks|GPS Running Watch",
            ),
        ),
        popularity=1.1,
    ),
    Category(
        "Sports > Running Gear",
        ("Stridewell", "Pacer", "Fleetfoot"),
        "Small kit that makes long runs easier.",
        (
            _t(
                "Running Socks",
                "Merino Cushioned|No-Show",
                "running socks",
                (9, 24),
                "blister-free seams|moisture wicking|arch support",
            ),
            _t(
                "Running Belt",
                "Zip Pocket|Bottle Holder",
                "running belt|phone belt",
                (12, 35),
                "a bounce-free fit|reflective trim|room for a phone",
            ),
            _t(
                "Hydration Vest",
                "5L|12L",
                "hydration vest|running vest",
                (59, 149),
                "two soft flasks|a stretch mesh back|adjustable sternum straps",
            ),
            _t(
                "GPS Running Watch",
                "Multisport|Entry",
                "gps watch|running watch",
                (149, 499),
                "wrist heart rate|a 14-day battery|offline maps",
                "Heart Rate Strap",
            ),
            _t(
                "Heart Rate Strap",
                "Chest",
                "heart rate monitor|chest strap",
                (39, 89),
                "ECG accuracy|Bluetooth and ANT+|a soft strap",
            ),
            _t(
                "Running Jacket",
                "Packable Windproof|Reflective Night",
                "running jacket|windbreaker",
                (49, 149),
                "a packable hood|reflective details|a water-repellent finish",
            ),
        ),
        popularity=0.8,
    ),
    Category(
        "Outdoors > Camping",
        ("Northmoor", "Ridgeback", "Ember & Pine"),
        "Ready for weekend trips and long treks alike.",
        (
            _t(
                "Tent",
                "2-Person Backpacking|4-Person Family|Ultralight 1-Person",
                "tent|camping tent|backpacking tent",
                (89, 499),
                "a freestanding frame|a full rainfly|two vestibules",
                "Sleeping Bag|Sleeping Pad|Headlamp",
            ),
            _t(
                "Sleeping Bag",
                "Down 0C|Synthetic Summer",
                "sleeping bag",
                (49, 349),
                "a draft collar|a compression sack|a two-way zip",
            ),
            _t(
                "Sleeping Pad",
                "Self-Inflating|Closed-Cell Foam",
                "sleeping pad|camping mat",
                (29, 149),
                "an R-value of 4|a packable size|a quiet surface",
            ),
            _t(
                "Camping Stove",
                "Compact Canister|Two-Burner",
                "camping stove|backpacking stove",
                (29, 149),
                "piezo ignition|a wind shield|a simmer control",
                "Camping Cookware Set",
            ),
            _t(
                "Headlamp",
                "Rechargeable 400-Lumen|Red-Light Night",
                "headlamp|head torch",
                (19, 69),
                "a USB-C rechargeable battery|a red night mode|IPX4 splash resistance",
            ),
            _t(
                "Hiking Backpack",
                "45L|65L Expedition",
                "hiking backpack|backpacking pack",
                (79, 279),
                "an adjustable torso|a rain cover|hip-belt pockets",
            ),
            _t(
                "Camping Cookware Set",
                "Titanium|Nesting Aluminium",
                "camping cookware|camping pots",
                (25, 99),
                "a nesting design|folding handles|a mesh storage bag",
            ),
        ),
    ),
    Category(
        "Beauty > Skincare",
        ("Lumiere", "Verdana", "Aqualis"),
        "Dermatologist tested and suitable for sensitive skin.",
        (
            _t(
                "Moisturizer",
                "Hydrating Daily|Oil-Free Gel|Night Repair",
                "moisturizer|face cream|night cream",
                (14, 59),
                "hyaluronic acid|ceramides|a fragrance-free formula",
                "Sunscreen",
            ),
            _t(
                "Face Serum",
                "Vitamin C Brightening|Hyaluronic Acid|Retinol Night",
                "face serum|vitamin c serum|retinol serum",
                (19, 69),
                "15% vitamin C|a lightweight texture|a dropper bottle",
                "Moisturizer",
            ),
            _t(
                "Sunscreen",
                "SPF 50 Mineral|SPF 30 Daily",
                "sunscreen|spf 50|sun cream",
                (12, 39),
                "broad-spectrum protection|no white cast|water resistance",
            ),
            _t(
                "Facial Cleanser",
                "Gentle Foaming|Exfoliating",
                "face wash|facial cleanser",
                (9, 29),
                "a pH-balanced formula|salicylic acid|a soap-free lather",
                "Moisturizer",
            ),
            _t(
                "Lip Balm",
                "Tinted SPF 15|Overnight Repair",
                "lip balm",
                (5, 19),
                "shea butter|SPF protection|a sheer tint",
            ),
        ),
    ),
    Category(
        "Home > Bedding",
        ("Dreamhaven", "Linnea", "Cloudloft"),
        "For deeper, cooler sleep every night.",
        (
            _t(
                "Pillow",
                "Memory Foam|Down Alternative|Cooling Gel",
                "pillow|memory foam pillow|cooling pillow",
                (25, 99),
                "a washable cover|adjustable loft|neck support",
                "Pillowcase Set",
            ),
            _t(
                "Duvet",
                "All-Season|Lightweight Summer",
                "duvet|comforter",
                (59, 249),
                "corner ties|box stitching|a hypoallergenic fill",
                "Duvet Cover",
            ),
            _t(
                "Sheet Set",
                "Egyptian Cotton|Washed Linen|Bamboo",
                "bed sheets|sheet set",
                (49, 199),
                "deep pockets|a breathable weave|two pillowcases",
            ),
            _t(
                "Duvet Cover",
                "Washed Cotton|Linen",
                "duvet cover",
                (45, 159),
                "a button closure|inside corner ties|a soft washed finish",
            ),
            _t(
                "Pillowcase Set",
                "Mulberry Silk|Cotton Sateen",
                "silk pillowcase|pillowcases",
                (19, 79),
                "an envelope closure|a smooth sheen|a set of two",
            ),
            _t(
                "Weighted Blanket",
                "7kg|9kg",
                "weighted blanket",
                (69, 179),
                "glass bead fill|a removable cover|even weight pockets",
            ),
        ),
    ),
    Category(
        "Sports > Fitness",
        ("Corevia", "Ironform", "Zenflex"),
        "Compact enough for a home gym.",
        (
            _t(
                "Yoga Mat",
                "Non-Slip 6mm|Travel 2mm|Natural Cork",
                "yoga mat|exercise mat",
                (19, 119),
                "a non-slip grip|alignment lines|a carry strap",
                "Yoga Block|Foam Roller",
            ),
            _t(
                "Adjustable Dumbbells",
                "24kg Pair|40kg Pair",
                "dumbbells|adjustable dumbbells",
                (149, 449),
                "a quick-change dial|a storage tray|knurled handles",
            ),
            _t(
                "Resistance Bands",
                "Loop Set of 5|Tube with Handles",
                "resistance bands|exercise bands",
                (12, 39),
                "five resistance levels|door anchors|a travel pouch",
            ),
            _t(
                "Foam Roller",
                "High-Density|Vibrating",
                "foam roller|massage roller",
                (19, 129),
                "a textured surface|three vibration speeds|a hollow core",
            ),
            _t(
                "Yoga Block",
                "Cork|EVA Foam",
                "yoga block",
                (9, 29),
                "bevelled edges|a non-slip surface|a lightweight build",
            ),
            _t(
                "Kettlebell",
                "Cast Iron 12kg|Cast Iron 16kg",
                "kettlebell",
                (29, 79),
                "a wide handle|a flat base|a powder-coated finish",
            ),
        ),
    ),
    Category(
        "Pets",
        ("Pawsome", "Barkley & Co", "Whiskerly"),
        "Vet approved and built to last.",
        (
            _t(
                "Dog Bed",
                "Orthopedic|Calming Donut",
                "dog bed|orthopedic dog bed",
                (29, 149),
                "a memory-foam base|a washable cover|raised bolsters",
                "Dog Toy",
            ),
            _t(
                "Dog Leash",
                "Reflective|Retractable",
                "dog leash|retractable leash",
                (12, 39),
                "a padded handle|reflective stitching|a locking clip",
                "Dog Harness",
            ),
            _t(
                "Dog Harness",
                "No-Pull|Escape-Proof",
                "dog harness|no pull harness",
                (19, 59),
                "a front clip|padded straps|quick-release buckles",
            ),
            _t(
                "Dog Toy",
                "Squeaky Plush|Rubber Chew",
                "dog toy|chew toy",
                (7, 25),
                "a tough build|a hidden squeaker|dishwasher-safe rubber",
            ),
            _t(
                "Cat Scratching Post",
                "Sisal Tower|Cardboard Lounger",
                "cat scratching post|cat tree",
                (19, 119),
                "natural sisal|a stable base|a dangling toy",
                "Cat Toy",
            ),
            _t(
                "Cat Toy",
                "Feather Wand|Catnip Mouse",
                "cat toy|catnip toy",
                (5, 19),
                "organic catnip|a telescopic wand|bright feathers",
            ),
            _t(
                "Pet Water Fountain",
                "Stainless Steel|Quiet Ceramic",
                "pet water fountain|cat fountain",
                (25, 69),
                "a replaceable filter|a whisper-quiet pump|a 2L tank",
            ),
        ),
    ),
)


# -- deterministic randomness ---------------------------------------------------------------------


class _Rng:
    """Every draw goes through random.random(), whose output Python guarantees across versions
    for a given seed, so the committed files regenerate byte for byte anywhere."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)

    def uniform(self) -> float:
        return self._random.random()

    def chance(self, p: float) -> bool:
        return self._random.random() < p

    def integer(self, low: int, high: int) -> int:
        """Uniform in [low, high]."""
        return low + min(int(self._random.random() * (high - low + 1)), high - low)

    def choice(self, items: Sequence[T], weights: Sequence[float] | None = None) -> T:
        if weights is None:
            return items[self.integer(0, len(items) - 1)]
        cumulative = list(accumulate(weights))
        point = self._random.random() * cumulative[-1]
        return items[min(bisect.bisect_right(cumulative, point), len(items) - 1)]

    def sample(self, items: Sequence[T], k: int) -> list[T]:
        pool = list(items)
        return [pool.pop(self.integer(0, len(pool) - 1)) for _ in range(min(k, len(pool)))]


# -- catalog --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Product:
    item_id: str
    title: str
    description: str
    category: str
    brand: str
    variant: str
    price: str
    kind: ProductType
    popularity: float


def make_catalog(rng: _Rng) -> list[Product]:
    """Every (type, variant) from two or three brands of its category, with Zipf popularity."""
    drafts: list[tuple[str, str, str, str, str, str, ProductType]] = []
    for category in CATEGORIES:
        for kind in category.types:
            for variant in kind.variants:
                brands = rng.sample(category.brands, 3 if rng.chance(0.25) else 2)
                for brand in brands:
                    title = f"{brand} {variant} {kind.name}"
                    features = rng.sample(kind.features, 2)
                    description = (
                        f"{_lead(variant, kind.name)} from {brand} "
                        f"with {features[0]} and {features[1]}. {category.use}"
                    )
                    low, high = kind.price
                    price = f"{rng.integer(low, high)}.99"
                    drafts.append((title, description, category.name, brand, variant, price, kind))
    # Zipf popularity over a shuffled order, so the head is spread over categories.
    ranks = rng.sample(range(len(drafts)), len(drafts))
    return [
        Product(f"P{n + 1:04d}", *draft, popularity=1.0 / (rank + 1) ** 0.7)
        for n, (draft, rank) in enumerate(zip(drafts, ranks, strict=True))
    ]


def _lead(variant: str, kind: str) -> str:
    """ "A Compact Pump Espresso Machine", or for plurals "True Wireless Earbuds"."""
    phrase = f"{variant} {kind}"
    if kind.endswith("s") and not kind.endswith("ss"):
        return phrase
    article = "An" if variant[0].lower() in "aeiou8" else "A"
    return f"{article} {phrase}"


# -- interactions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    user_id: str
    item_id: str
    timestamp: int
    weight: int
    query: str


@dataclass(frozen=True)
class User:
    user_id: str
    categories: tuple[str, ...]
    brands: dict[str, str]  # category → favourite brand
    sessions: int


def make_users(rng: _Rng) -> list[User]:
    """Users with 1-3 preferred categories, a favourite brand in each, and skewed activity."""
    names = [c.name for c in CATEGORIES]
    weights = [c.popularity for c in CATEGORIES]
    brands = {c.name: c.brands for c in CATEGORIES}
    users = []
    for n in range(USERS):
        count = rng.choice([1, 2, 3], [0.35, 0.45, 0.2])
        preferred: list[str] = []
        while len(preferred) < count:
            name = rng.choice(names, weights)
            if name not in preferred:
                preferred.append(name)
        favourite = {name: rng.choice(brands[name]) for name in preferred}
        # A long tail of light users and a few heavy ones.
        sessions = 1 + int(20 * rng.uniform() ** 2)
        users.append(User(f"U{n + 1:04d}", tuple(preferred), favourite, sessions))
    return users


class _Shop:
    """Lookups the session simulator needs: products by category and by type."""

    def __init__(self, products: list[Product]) -> None:
        self.by_category: dict[str, list[Product]] = {}
        self.by_type: dict[str, list[Product]] = {}
        for p in products:
            self.by_category.setdefault(p.category, []).append(p)
            self.by_type.setdefault(p.kind.name, []).append(p)
        accessory_names = {a for p in products for a in p.kind.accessories}
        self.accessory_names = accessory_names

    def pick(
        self, rng: _Rng, pool: Sequence[Product], brand: str | None, avoid: set[str]
    ) -> Product:
        options = [p for p in pool if p.item_id not in avoid] or list(pool)
        # Brand affinity: the favourite brand is several times likelier than its popularity alone.
        weights = [p.popularity * (4.0 if p.brand == brand else 1.0) for p in options]
        return rng.choice(options, weights)


def _query_for(rng: _Rng, product: Product) -> str:
    """What a user plausibly typed to find this product."""
    base = rng.choice(product.kind.queries)
    roll = rng.uniform()
    if roll < 0.2:
        return f"{product.brand.lower()} {base}"
    if roll < 0.45:
        return f"{product.variant} {product.kind.name}".lower()
    return base


def simulate_session(
    rng: _Rng, shop: _Shop, user: User, start: int, exploring: bool
) -> list[Event]:
    """Search or browse a category, view alternatives of one type, maybe buy, maybe add an accessory."""
    category = rng.choice(list(shop.by_category)) if exploring else rng.choice(user.categories)
    brand = user.brands.get(category)
    mains = [p for p in shop.by_category[category] if p.kind.name not in shop.accessory_names]
    first = shop.pick(rng, mains or shop.by_category[category], brand, set())
    searched = rng.chance(0.45)
    query = _query_for(rng, first) if searched else ""

    events: list[Event] = []
    clock = start

    def emit(product: Product, weight: int, text: str = "") -> None:
        nonlocal clock
        clock += rng.integer(20, 400)
        events.append(Event(user.user_id, product.item_id, clock, weight, text))

    viewed = [first]
    emit(first, VIEW, query)
    for _ in range(rng.choice([0, 1, 2, 3], [0.3, 0.35, 0.2, 0.15])):
        alternative = shop.pick(
            rng, shop.by_type[first.kind.name], brand, {p.item_id for p in viewed}
        )
        if alternative.item_id not in {p.item_id for p in viewed}:
            viewed.append(alternative)
            emit(alternative, VIEW, query)
    if not rng.chance(0.5):
        return events
    chosen = rng.choice(viewed, [p.popularity * (3.0 if p.brand == brand else 1.0) for p in viewed])
    emit(chosen, CART)
    if rng.chance(0.65):
        emit(chosen, PURCHASE)
    if chosen.kind.accessories and rng.chance(0.7):
        kind = rng.choice(chosen.kind.accessories)
        accessory = shop.pick(rng, shop.by_type[kind], chosen.brand, set())
        emit(accessory, VIEW)
        if rng.chance(0.4):
            emit(accessory, CART)
            if rng.chance(0.7):
                emit(accessory, PURCHASE)
    return events


def make_interactions(rng: _Rng, products: list[Product]) -> list[Event]:
    """All users' sessions spread over the window, as one log ordered by time."""
    shop = _Shop(products)
    events: list[Event] = []
    for user in make_users(rng):
        starts = sorted(START_EPOCH + rng.integer(0, WINDOW_SECONDS) for _ in range(user.sessions))
        for start in starts:
            events.extend(simulate_session(rng, shop, user, start, exploring=rng.chance(0.1)))
    events.sort(key=lambda e: (e.timestamp, e.user_id))
    return events


# -- search queries -------------------------------------------------------------------------------


def make_queries(products: list[Product]) -> list[dict[str, object]]:
    """Each type's search phrases with the items of that type as relevant, split like MovieLens tags."""
    by_query: dict[str, list[str]] = {}
    for p in products:
        for query in p.kind.queries:
            by_query.setdefault(query, []).append(p.item_id)
    return [
        {
            "query": query,
            "item_ids": ids,
            "split": "test" if hashlib.md5(query.encode()).digest()[0] % 2 else "train",
        }
        for query, ids in sorted(by_query.items())
    ]


# -- files ----------------------------------------------------------------------------------------


def later_sessions(days: int, seed: int = 8, sample_seed: int = 7) -> list[Event]:
    """The sample's users (same tastes) shopping for `days` more after its window, with a fresh
    seed: what a log holds some time after the sample bundle was built."""
    rng = _Rng(sample_seed)
    shop = _Shop(make_catalog(rng))
    users = make_users(rng)  # the first draws after the catalog's, as in make_interactions
    later, start, span = _Rng(seed), START_EPOCH + WINDOW_SECONDS, days * 24 * 3600
    events: list[Event] = []
    for user in users:
        count = max(1, round(user.sessions * span / WINDOW_SECONDS))
        for begin in sorted(start + later.integer(0, span) for _ in range(count)):
            events.extend(simulate_session(later, shop, user, begin, exploring=later.chance(0.1)))
    events.sort(key=lambda e: (e.timestamp, e.user_id))
    return events


def write_grown_log(path: Path, days: int = 30, seed: int = 8) -> Path:
    """The sample interactions followed by `later_sessions(days, seed)`, as one CSV."""
    rows = [
        [e.user_id, e.item_id, str(e.timestamp), str(e.weight), e.query]
        for e in later_sessions(days, seed)
    ]
    text = (SAMPLE_DIR / INTERACTIONS_FILE).read_text(encoding="utf-8")
    with path.open("w", encoding="utf-8", newline="") as handle:
        handle.write(text)
        csv.writer(handle, lineterminator="\n").writerows(rows)
    return path


def generate(out_dir: Path, seed: int = 7) -> tuple[Path, Path]:
    """Writes catalog.csv, interactions.csv (and queries.jsonl) into out_dir; same seed, same bytes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = _Rng(seed)
    products = make_catalog(rng)
    events = make_interactions(rng, products)
    catalog_path, interactions_path = out_dir / CATALOG_FILE, out_dir / INTERACTIONS_FILE
    _write_csv(
        catalog_path,
        ["item_id", "title", "description", "category", "brand", "price"],
        [[p.item_id, p.title, p.description, p.category, p.brand, p.price] for p in products],
    )
    _write_csv(
        interactions_path,
        ["user_id", "item_id", "timestamp", "weight", "query"],
        [[e.user_id, e.item_id, str(e.timestamp), str(e.weight), e.query] for e in events],
    )
    with (out_dir / QUERIES_FILE).open("w", encoding="utf-8", newline="\n") as handle:
        for record in make_queries(products):
            handle.write(json.dumps(record) + "\n")
    return catalog_path, interactions_path


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    # "\n" line ends regardless of platform, so the committed bytes compare equal everywhere.
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def sample_paths() -> tuple[Path, Path]:
    """The packaged sample (catalog.csv, interactions.csv)."""
    return SAMPLE_DIR / CATALOG_FILE, SAMPLE_DIR / INTERACTIONS_FILE


def sample_queries_path() -> Path:
    """The packaged sample's search queries (JSON lines, the MovieLens queries.jsonl shape)."""
    return SAMPLE_DIR / QUERIES_FILE


if __name__ == "__main__":
    catalog, interactions = generate(SAMPLE_DIR)
    print(f"wrote {catalog}, {interactions} and {SAMPLE_DIR / QUERIES_FILE}")
